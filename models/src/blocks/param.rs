//! A parameter as a layer holds it, and fetching a layer's parameters from the store in spec order.

use brigade_engine::{ParamSpec, ParamStore};
use candle_core::{Result, Tensor};

/// A parameter as a layer holds it: its name (gradients are reported by name) and its value.
#[derive(Debug, Clone)]
pub(crate) struct Param {
    pub(crate) name: String,
    pub(crate) value: Tensor,
}

/// Gets `N` parameters from the store in spec order.
pub(crate) fn get_all<const N: usize>(store: &mut ParamStore, specs: &[ParamSpec]) -> Result<[Param; N]> {
    let params =
        specs.iter().map(|s| Ok(Param { name: s.name.clone(), value: store.get(s)? })).collect::<Result<Vec<_>>>()?;
    let got = params.len();
    params.try_into().map_err(|_| candle_core::Error::Msg(format!("expected {N} parameters, got {got}")))
}
