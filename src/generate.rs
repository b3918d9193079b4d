//! Text generation from a GPT pipeline: the decoding loop and the samplers `generate` uses.
//!
//! Two ways to get each next token's logits:
//! - **KV cache** ([`Decoding::Cached`], the default): the prompt goes through once (prefill),
//!   then each step runs only the newest token through [`Pipeline::decode`]; every attention
//!   layer keeps the keys and values of the positions before it, on whichever stage it lives.
//!   A step costs one token's forward instead of the whole window's.
//! - **Full window** ([`Decoding::FullWindow`]): each step runs the last `n_ctx` tokens through
//!   [`Pipeline::predict`] and keeps the last position's logits. Slow; the yardstick the cache
//!   is tested against (greedy decoding gives the same tokens).
//!
//! Past the context window: the full-window path slides by one token (the oldest drops out).
//! A cache cannot drop its first position (every later key was computed with it in view and
//! with absolute position embeddings), so when the cache is full the cached path restarts it
//! from the newest `n_ctx / 2` tokens (one prefill) and goes on one token at a time. Both keep
//! generating for as long as asked; beyond `n_ctx` tokens their outputs are different (each is
//! a valid truncation of the history).

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::engine::pipeline::Pipeline;
use crate::Error;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0: greedy (arg-max); otherwise sample from `softmax(logits / temperature)`.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens before sampling (`None`: all).
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
    /// `p` (`None` or 1: all).
    pub top_p: Option<f64>,
}

impl Sampling {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: None }
    }

    /// Checks the settings: temperature finite and not negative, `top_k` at least 1, `top_p`
    /// in (0, 1].
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Config(format!("temperature must be a non-negative number, got {}", self.temperature)));
        }
        if self.top_k == Some(0) {
            return Err(Error::Config("top-k must be at least 1".into()));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Config(format!("top-p must be in (0, 1], got {p}")));
            }
        }
        Ok(())
    }

    /// The next token for `logits` (one position's, length V).
    pub fn pick(&self, logits: &[f32], rng: &mut StdRng) -> usize {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        // Candidates by decreasing logit (ties by lower id), cut by top-k.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if let Some(k) = self.top_k {
            order.truncate(k.max(1));
        }
        let max = logits[order[0]] as f64;
        let mut weights: Vec<f64> =
            order.iter().map(|&i| ((logits[i] as f64 - max) / self.temperature).exp()).collect();
        if let Some(p) = self.top_p.filter(|&p| p < 1.0) {
            let total: f64 = weights.iter().sum();
            let mut kept = 0.0;
            let mut keep = weights.len();
            for (n, w) in weights.iter().enumerate() {
                kept += w / total;
                if kept >= p {
                    keep = n + 1;
                    break;
                }
            }
            weights.truncate(keep);
        }
        let total: f64 = weights.iter().sum();
        let mut draw = rng.random::<f64>() * total;
        for (n, w) in weights.iter().enumerate() {
            if draw < *w {
                return order[n];
            }
            draw -= w;
        }
        order[weights.len() - 1]
    }
}

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

/// Where each step's logits come from (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoding {
    Cached,
    FullWindow,
}

/// What to generate: how many tokens at most, how each is picked, where the logits come from,
/// the sampler's seed, and the token that ends the generation early.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Generation {
    pub tokens: usize,
    pub sampling: Sampling,
    pub decoding: Decoding,
    pub seed: u64,
    /// The end-of-sequence token (the tokenizer's eos): once it is picked, it is streamed and
    /// returned as the last token, as transformers' `generate` stops at `eos_token_id`.
    /// `None`: always `tokens` tokens.
    pub eos: Option<u32>,
}

/// Generates `request.tokens` tokens after `prompt` (not empty) with a GPT `pipeline` of
/// context `context`, calling `on_token` with each as soon as it is chosen (to stream it), and
/// stopping early after `request.eos`. Returns the generated tokens.
pub fn generate(
    pipeline: &mut Pipeline,
    context: usize,
    prompt: &[u32],
    request: Generation,
    mut on_token: impl FnMut(u32) -> Result<(), Error>,
) -> Result<Vec<u32>, Error> {
    let Generation { tokens, sampling, decoding, seed, eos } = request;
    sampling.validate()?;
    if prompt.is_empty() {
        return Err(Error::Config("generation needs a prompt of at least one token".into()));
    }
    if context == 0 {
        return Err(Error::Config("the model's context is empty".into()));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids: Vec<u32> = prompt.to_vec();
    let mut out = Vec::with_capacity(tokens);
    // Cached path: how many positions the cache holds (the window's start is ids.len() - cached).
    let mut cached = 0usize;
    for _ in 0..tokens {
        let logits = match decoding {
            Decoding::FullWindow => {
                let window = &ids[ids.len().saturating_sub(context)..];
                last_logits(&pipeline.predict(&row(window)?)?)?
            }
            Decoding::Cached if cached > 0 && cached < context => {
                let newest = &ids[ids.len() - 1..];
                let logits = last_logits(&pipeline.decode(&row(newest)?, cached)?)?;
                cached += 1;
                logits
            }
            Decoding::Cached => {
                // Prefill: the prompt (its last `context` tokens), or a full cache restarted
                // from the newest half window.
                let keep = if cached == 0 { ids.len().min(context) } else { (context / 2).max(1) };
                let window = &ids[ids.len() - keep..];
                let logits = last_logits(&pipeline.decode(&row(window)?, 0)?)?;
                cached = keep;
                logits
            }
        };
        let next = sampling.pick(&logits, &mut rng) as u32;
        ids.push(next);
        out.push(next);
        on_token(next)?;
        if eos == Some(next) {
            break;
        }
    }
    Ok(out)
}

/// `(1, T)` token ids.
fn row(ids: &[u32]) -> Result<Tensor, Error> {
    Ok(Tensor::new(ids, &Device::Cpu).and_then(|t| t.unsqueeze(0)).map_err(crate::engine::error::EngineError::from)?)
}

/// The last position's logits of `(1, T, V)`.
fn last_logits(logits: &Tensor) -> Result<Vec<f32>, Error> {
    let t = logits.dim(1).map_err(crate::engine::error::EngineError::from)?;
    Ok(logits
        .get(0)
        .and_then(|l| l.get(t - 1))
        .and_then(|l| l.to_vec1())
        .map_err(crate::engine::error::EngineError::from)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Top-k 1 is greedy whatever the temperature; top-p keeps the nucleus only (tokens outside
    /// it never come up in 2000 draws); tiny temperatures are arg-max.
    #[test]
    fn samplers_keep_only_what_they_should() {
        let logits = [1.0f32, 3.0, 2.9, -1.0, 0.0];
        let mut rng = StdRng::seed_from_u64(1);
        let top1 = Sampling { temperature: 5.0, top_k: Some(1), top_p: None };
        assert!((0..200).all(|_| top1.pick(&logits, &mut rng) == 1));
        let top2 = Sampling { temperature: 1.0, top_k: Some(2), top_p: None };
        let picks: Vec<usize> = (0..2000).map(|_| top2.pick(&logits, &mut rng)).collect();
        assert!(picks.iter().all(|&p| p == 1 || p == 2));
        assert!(picks.contains(&1) && picks.contains(&2));
        // softmax: p(1) ≈ 0.44, p(2) ≈ 0.40, p(0) ≈ 0.06: a nucleus of 0.8 is {1, 2}.
        let nucleus = Sampling { temperature: 1.0, top_k: None, top_p: Some(0.8) };
        let picks: Vec<usize> = (0..2000).map(|_| nucleus.pick(&logits, &mut rng)).collect();
        assert!(picks.iter().all(|&p| p == 1 || p == 2), "{:?}", picks.iter().find(|&&p| p != 1 && p != 2));
        let all = Sampling { temperature: 1.0, top_k: None, top_p: None };
        let picks: Vec<usize> = (0..2000).map(|_| all.pick(&logits, &mut rng)).collect();
        assert!(picks.contains(&0) && picks.contains(&4));
        assert_eq!(Sampling { temperature: 1e-6, top_k: None, top_p: None }.pick(&logits, &mut rng), 1);
        assert_eq!(Sampling::greedy().pick(&logits, &mut rng), 1);
        assert!(Sampling { temperature: -1.0, ..Sampling::greedy() }.validate().is_err());
        assert!(Sampling { top_k: Some(0), ..Sampling::greedy() }.validate().is_err());
        assert!(Sampling { top_p: Some(1.5), ..Sampling::greedy() }.validate().is_err());
        assert!(Sampling { top_p: Some(0.0), ..Sampling::greedy() }.validate().is_err());
    }
}
