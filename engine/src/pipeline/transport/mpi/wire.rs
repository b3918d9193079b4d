//! The wire format: what crosses between ranks, as byte messages. A hand-off is a safetensors
//! buffer whose one tensor `t` carries dtype, shape and data and whose metadata is the routing
//! header (kind, receiving chunk, micro-batch, receiving device); one replica's gradients of one
//! stage are a safetensors buffer with the tensors named by position and (stage, replica, count)
//! in its metadata. Safetensors because it is already the checkpoint format: a self-describing
//! header, exact bits, and a decoder that rejects a truncated buffer instead of panicking.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::ReplicaGrads;
use crate::pipeline::handoff::HandOff;
use crate::pipeline::protocol::Msg;
use crate::pipeline::transport::{Route, RouteKind};

/// One hand-off as one byte message: a safetensors buffer (dtype, shape and data of tensor `t`)
/// whose metadata is the routing header.
pub(super) fn encode(device: usize, key: Route, tensor: HandOff) -> Result<Vec<u8>, String> {
    let tensor = tensor.receive(&Device::Cpu).map_err(|e| e.to_string())?;
    let kind = match key.kind {
        RouteKind::Activation => "activation",
        RouteKind::Gradient => "gradient",
    };
    let header: HashMap<String, String> = [
        ("kind", kind.to_string()),
        ("chunk", key.chunk.to_string()),
        ("microbatch", key.microbatch.to_string()),
        ("device", device.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    safetensors::serialize([("t", &tensor)], Some(header)).map_err(|e| e.to_string())
}

pub(super) fn decode(bytes: &[u8]) -> Result<(usize, Msg), String> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let header = meta.metadata().as_ref().ok_or("no header")?;
    let field = |name: &str| -> Result<usize, String> {
        header.get(name).and_then(|v| v.parse().ok()).ok_or_else(|| format!("no {name} in the header"))
    };
    let (chunk, microbatch, device) = (field("chunk")?, field("microbatch")?, field("device")?);
    let mut tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| e.to_string())?;
    let tensor: Tensor = tensors.remove("t").ok_or("no tensor")?;
    let tensor = HandOff::send(tensor).map_err(|e| e.to_string())?;
    let msg = match header.get("kind").map(String::as_str) {
        Some("activation") => Msg::Activation { chunk, microbatch, tensor },
        Some("gradient") => Msg::Gradient { chunk, microbatch, tensor },
        other => return Err(format!("unknown kind {other:?}")),
    };
    Ok((device, msg))
}

/// One replica's gradients of one stage as one byte message: a safetensors buffer with the
/// tensors named by position and (stage, replica, count) in its metadata.
pub(super) fn encode_replica(stage: usize, replica: usize, grads: &[Tensor]) -> Result<Vec<u8>, String> {
    let on_cpu: Vec<(String, Tensor)> = grads
        .iter()
        .enumerate()
        .map(|(i, g)| Ok((i.to_string(), g.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()
        .map_err(|e| e.to_string())?;
    let header: HashMap<String, String> = [
        ("stage".to_string(), stage.to_string()),
        ("replica".to_string(), replica.to_string()),
        ("count".to_string(), grads.len().to_string()),
    ]
    .into_iter()
    .collect();
    safetensors::serialize(on_cpu.iter().map(|(n, t)| (n.as_str(), t)), Some(header)).map_err(|e| e.to_string())
}

/// (stage, (replica, gradients in order)).
pub(super) fn decode_replica(bytes: &[u8]) -> Result<(usize, ReplicaGrads), String> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let header = meta.metadata().as_ref().ok_or("no header")?;
    let field = |name: &str| -> Result<usize, String> {
        header.get(name).and_then(|v| v.parse().ok()).ok_or_else(|| format!("no {name} in the header"))
    };
    let (stage, replica, count) = (field("stage")?, field("replica")?, field("count")?);
    let mut tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| e.to_string())?;
    let grads = (0..count)
        .map(|i| tensors.remove(&i.to_string()).ok_or_else(|| format!("no gradient {i} of {count}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((stage, (replica, grads)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::transport::Mailbox;

    #[test]
    fn a_hand_off_survives_its_byte_message_with_key_dtype_shape_and_bits() {
        let tensor = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((2, 3, 4)).unwrap();
        let tensor = (tensor / 7.0).unwrap();
        let bytes = encode(3, Route::gradient(5, 7), HandOff::send(tensor.clone()).unwrap()).unwrap();
        let (device, msg) = decode(&bytes).unwrap();
        assert_eq!(device, 3);
        let (key, got) = Mailbox::handoff_of(msg).ok().unwrap();
        assert_eq!(key, Route::gradient(5, 7));
        let got = got.receive(&Device::Cpu).unwrap();
        assert_eq!(got.dims(), &[2, 3, 4]);
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(decode(&bytes[..bytes.len() / 2]).is_err(), "a truncated message is an error, not a panic");
    }

    #[test]
    fn replica_gradients_survive_their_byte_message_in_order() {
        let grads: Vec<Tensor> =
            (0..12).map(|i| (Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap() / (i as f64 + 3.0)).unwrap()).collect();
        let bytes = encode_replica(3, 1, &grads).unwrap();
        let (stage, (replica, got)) = decode_replica(&bytes).unwrap();
        assert_eq!((stage, replica, got.len()), (3, 1, 12));
        for (want, got) in grads.iter().zip(&got) {
            assert_eq!(want.to_vec1::<f32>().unwrap(), got.to_vec1::<f32>().unwrap());
        }
        assert!(decode_replica(&bytes[..bytes.len() / 2]).is_err());
    }
}
