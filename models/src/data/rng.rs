//! A tiny deterministic random generator for data sampling and generation.
//!
//! Why not `rand::rngs::StdRng`: its algorithm is explicitly allowed to change between `rand`
//! releases, and a resumed training run must see exactly the batches it would have seen. This
//! SplitMix64 generator is a dozen lines, fixed forever, and plenty good for picking windows and
//! drawing shapes.

/// SplitMix64 (Steele, Lea & Flood 2014): a 64-bit counter pushed through a strong mixer.
#[derive(Debug, Clone)]
pub(crate) struct DetRng {
    state: u64,
}

/// The SplitMix64 finaliser: a bijective 64-bit mix with good avalanche.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl DetRng {
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for one (seed, stream, index) triple. Mixing each part in turn (rather than
    /// xoring them) keeps e.g. (seed 1, index 2) and (seed 2, index 1) unrelated.
    pub(crate) fn for_stream(seed: u64, stream: u64, index: u64) -> Self {
        let a = mix64(seed ^ 0x5851_F42D_4C95_7F2D);
        let b = mix64(a ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Self::new(mix64(b ^ index))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// Uniform integer in `0..n` (`n > 0`). Multiply-shift (Lemire) without the rejection step:
    /// the bias is below 2^-32 for the sizes used here, far under any sampling noise.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    pub(crate) fn below_usize(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// Uniform float in `[0, 1)` from the top 24 bits (exactly representable in f32).
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    pub(crate) fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    pub(crate) fn chance(&mut self, p: f32) -> bool {
        self.unit() < p
    }

    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below_usize(items.len())]
    }
}
