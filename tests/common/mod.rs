//! What several integration tests share.

/// bf16 mixed precision follows f32's loss curve: step 1 within 1e-3 relative, every step
/// within 3%, the mean of the last 10 within 2%, and not identical (a run silently in f32 would
/// be). `what` names the run in the messages. Returns the per-step relative gaps.
pub fn assert_bf16_follows_f32(what: &str, f32_losses: &[f64], bf16_losses: &[f64]) -> Vec<f64> {
    let rel: Vec<f64> = f32_losses.iter().zip(bf16_losses).map(|(a, b)| ((a - b) / a).abs()).collect();
    eprintln!("{what}: step-1 gap {:.2e}, largest gap {:.2e}", rel[0], rel.iter().cloned().fold(0.0, f64::max));
    assert!(rel[0] < 1e-3, "{what}, step 1: f32 {} vs bf16 {}", f32_losses[0], bf16_losses[0]);
    for (step, r) in rel.iter().enumerate() {
        assert!(
            *r < 0.03,
            "{what}, step {}: f32 {} vs bf16 {} ({r:.3})",
            step + 1,
            f32_losses[step],
            bf16_losses[step]
        );
    }
    let tail = |l: &[f64]| l[l.len() - 10..].iter().sum::<f64>() / 10.0;
    let (tail_f32, tail_bf16) = (tail(f32_losses), tail(bf16_losses));
    assert!(
        ((tail_f32 - tail_bf16) / tail_f32).abs() < 0.02,
        "{what}, last 10 steps: f32 {tail_f32} vs bf16 {tail_bf16}"
    );
    assert!(rel.iter().any(|r| *r > 1e-5), "{what}: bf16 losses equal f32's: the layers did not compute in bf16");
    rel
}
