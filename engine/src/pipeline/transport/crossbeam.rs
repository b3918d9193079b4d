//! The in-process transport: every stage is a thread with a crossbeam inbox; peers send into
//! it directly and the end-of-step collective goes through the driver's report channel (the
//! driver answers with `Msg::Reduced` into the same inbox). This is the engine's behaviour
//! from before the seam, message for message.

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::{Closed, Route, RouteKind, Transport};
use crate::pipeline::handoff::HandOff;
use crate::pipeline::protocol::{Msg, Report};

/// One stage's ends of the in-process channels.
pub(in crate::pipeline) struct Crossbeam {
    inbox: Receiver<Msg>,
    /// Every device's inbox, by device index (this one's included).
    peers: Vec<Sender<Msg>>,
    reports: Sender<Report>,
}

impl Crossbeam {
    pub fn new(inbox: Receiver<Msg>, peers: Vec<Sender<Msg>>, reports: Sender<Report>) -> Self {
        Self { inbox, peers, reports }
    }
}

impl Transport for Crossbeam {
    fn send(&self, to: usize, key: Route, tensor: HandOff) -> Result<(), Closed> {
        let Route { kind, chunk, microbatch } = key;
        let msg = match kind {
            RouteKind::Activation => Msg::Activation { chunk, microbatch, tensor },
            RouteKind::Gradient => Msg::Gradient { chunk, microbatch, tensor },
        };
        // Unbounded: a send never waits for the receiver.
        self.peers.get(to).ok_or(Closed)?.send(msg).map_err(|_| Closed)
    }

    fn recv(&self) -> Result<Msg, Closed> {
        self.inbox.recv().map_err(|_| Closed)
    }

    fn try_recv(&self) -> Option<Msg> {
        self.inbox.try_recv().ok()
    }

    fn recv_timeout(&self, timeout: Duration) -> Result<Option<Msg>, Closed> {
        match self.inbox.recv_timeout(timeout) {
            Ok(msg) => Ok(Some(msg)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(Closed),
        }
    }

    fn contribute(&self, stage: usize, tied_grads: Vec<(String, HandOff)>, sq_norm: f64) -> Result<(), Closed> {
        self.reports.send(Report::Partial { stage, tied_grads, sq_norm }).map_err(|_| Closed)
    }
}
