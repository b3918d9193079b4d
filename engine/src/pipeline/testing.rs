//! Fault injection, for tests only (compiled with the `testing` cargo feature, which only the
//! tests enable): makes a chosen stage fail (error, panic, non-finite loss) at a chosen action,
//! to check that one failing stage stops the whole pipeline cleanly.
//!
//! Not part of the pipeline's configuration: a fault is armed on a running pipeline with
//! [`inject_fault`], which sends it to the stage's inbox. The stage keeps it until the pipeline
//! ends, so the next step meets it.

use super::driver::Pipeline;
use super::protocol::Msg;
pub use super::protocol::{Fault, FaultKind};
use crate::error::{EngineError, Result};

/// Arms `fault` in its stage of `pipeline`; the next training step meets it.
///
/// Stages are idle between calls on the pipeline and take their inbox in order, so the fault
/// is in place before the next step's work arrives.
pub fn inject_fault(pipeline: &mut Pipeline, fault: Fault) -> Result<()> {
    pipeline.ensure_running()?;
    let stages = pipeline.stage_count();
    if fault.stage >= stages {
        return Err(EngineError::Config(format!("no stage {} to inject a fault into ({stages} stages)", fault.stage)));
    }
    pipeline.send(fault.stage, Msg::InjectFault(fault))
}
