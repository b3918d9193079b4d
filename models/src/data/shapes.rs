//! The embedded image data: procedurally drawn shapes in 10 classes.
//!
//! Each image is a random background colour with a faint lighting gradient, one shape in a
//! contrasting random colour at a random position, scale and small rotation (±15°, so bars,
//! diagonals, plus and cross stay distinct classes), up to two single-pixel-ish specks of
//! clutter, and per-pixel Gaussian-ish noise.
//! Colour carries no class information (both colours are random), so a model must learn
//! geometry: edges, orientation, holes, thin vs filled. That keeps it learnable for a small CNN
//! (well above the 10% chance level within a few hundred steps) without being trivially
//! separable by a single statistic such as mean brightness.

use super::rng::DetRng;

/// Class names, index = label.
pub const SHAPE_CLASSES: [&str; 10] = [
    "circle",
    "square",
    "triangle",
    "cross",
    "plus",
    "horizontal bar",
    "vertical bar",
    "ring",
    "diagonal line",
    "dot grid",
];

/// Smallest image side length at which every class is still recognisable.
pub const MIN_SHAPE_SIZE: usize = 8;

/// Std of the additive pixel noise (pixel values are in [0, 1] before normalisation).
const NOISE_STD: f32 = 0.1;
/// Largest rotation of a shape, radians (15°).
const MAX_TILT: f32 = 0.26;

/// Draws `n` images (labels `i % 10` for image `i`, so classes are balanced) of 3 × `size` ×
/// `size` raw pixels in `[0, 1]`, CHW layout. Image `i` depends only on `(seed, stream, i)`,
/// so train and validation (different streams) are independent draws.
pub(crate) fn generate(n: usize, size: usize, seed: u64, stream: u64) -> (Vec<f32>, Vec<u32>) {
    let per = 3 * size * size;
    let mut pixels = vec![0f32; n * per];
    let mut labels = Vec::with_capacity(n);
    for (i, img) in pixels.chunks_exact_mut(per.max(1)).enumerate().take(n) {
        let class = i % SHAPE_CLASSES.len();
        let mut rng = DetRng::for_stream(seed, stream, i as u64);
        draw(&mut rng, class, size, img);
        labels.push(class as u32);
    }
    (pixels, labels)
}

fn draw(rng: &mut DetRng, class: usize, size: usize, img: &mut [f32]) {
    let s = size as f32;
    let bg = [rng.unit(), rng.unit(), rng.unit()];
    // Foreground at least 0.4 away (Euclidean, RGB) from the background, or the shape could
    // vanish into the noise; a few tries, then the complementary colour, which is far enough
    // from all but mid-grey backgrounds.
    let mut fg = [1.0 - bg[0], 1.0 - bg[1], 1.0 - bg[2]];
    for _ in 0..16 {
        let c = [rng.unit(), rng.unit(), rng.unit()];
        let d2: f32 = (0..3).map(|k| (c[k] - bg[k]).powi(2)).sum();
        if d2 >= 0.16 {
            fg = c;
            break;
        }
    }
    let r = rng.range(0.2, 0.38) * s;
    let margin = r + 1.0;
    let cx = rng.range(margin, (s - margin).max(margin));
    let cy = rng.range(margin, (s - margin).max(margin));
    let t = (0.16 * r).max(0.8); // half-thickness of strokes
    let diag_sign = if rng.chance(0.5) { 1.0 } else { -1.0 };
    let (gx, gy) = (rng.range(-0.15, 0.15), rng.range(-0.15, 0.15));
    let (sin, cos) = rng.range(-MAX_TILT, MAX_TILT).sin_cos();
    // Clutter: 0-2 specks of 1-2 px anywhere, in random colours, so "count the blobs" or
    // "any pixel of another colour" is not a shortcut.
    let specks: Vec<(f32, f32, f32, [f32; 3])> = (0..rng.below(3))
        .map(|_| {
            let (x, y) = (rng.range(0.0, s), rng.range(0.0, s));
            (x, y, rng.range(0.5, 1.0), [rng.unit(), rng.unit(), rng.unit()])
        })
        .collect();

    for y in 0..size {
        for x in 0..size {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let (ux, uy) = (px - cx, py - cy);
            let (dx, dy) = (cos * ux + sin * uy, -sin * ux + cos * uy);
            let on = inside(class, dx, dy, r, t, diag_sign);
            let speck = specks.iter().find(|(sx, sy, sr, _)| (px - sx).abs() <= *sr && (py - sy).abs() <= *sr);
            // Lighting gradient across the image, centred so the mean stays the colour.
            let light = gx * (x as f32 / s - 0.5) + gy * (y as f32 / s - 0.5);
            for ch in 0..3 {
                let base = match speck {
                    Some((.., colour)) => colour[ch],
                    None if on => fg[ch],
                    None => bg[ch],
                };
                let noise = NOISE_STD * approx_normal(rng);
                img[ch * size * size + y * size + x] = (base + light + noise).clamp(0.0, 1.0);
            }
        }
    }
}

/// Irwin–Hall with 3 uniforms, rescaled to unit variance: noise only needs to look Gaussian-ish
/// and this is several times cheaper than Box–Muller per pixel.
fn approx_normal(rng: &mut DetRng) -> f32 {
    (rng.unit() + rng.unit() + rng.unit() - 1.5) * 2.0
}

/// Whether the pixel at offset (dx, dy) from the shape centre (y grows downwards) belongs to the
/// shape of `class` with scale `r` and stroke half-thickness `t`.
fn inside(class: usize, dx: f32, dy: f32, r: f32, t: f32, diag_sign: f32) -> bool {
    let d = (dx * dx + dy * dy).sqrt();
    let box_r = dx.abs().max(dy.abs());
    let sqrt2 = std::f32::consts::SQRT_2;
    match class {
        0 => d <= r,
        1 => box_r <= 0.8 * r,
        2 => {
            // Apex at the top (dy = -r), base of width 2r at the bottom.
            let v = (dy + r) / (2.0 * r);
            (0.0..=1.0).contains(&v) && dx.abs() <= v * r
        }
        3 => box_r <= 0.85 * r && ((dx - dy).abs() <= t * sqrt2 || (dx + dy).abs() <= t * sqrt2),
        4 => (dy.abs() <= t && dx.abs() <= r) || (dx.abs() <= t && dy.abs() <= r),
        5 => dy.abs() <= 1.5 * t && dx.abs() <= r,
        6 => dx.abs() <= 1.5 * t && dy.abs() <= r,
        7 => d <= r && d >= r - 2.0 * t,
        8 => box_r <= 0.85 * r && (dx - diag_sign * dy).abs() <= t * sqrt2,
        _ => {
            let dot = (0.17 * r).max(1.0);
            let step = 0.7 * r;
            // Nearest grid point among offsets {-step, 0, step} on each axis.
            let nx = (dx / step).round().clamp(-1.0, 1.0) * step;
            let ny = (dy / step).round().clamp(-1.0, 1.0) * step;
            ((dx - nx).powi(2) + (dy - ny).powi(2)).sqrt() <= dot
        }
    }
}
