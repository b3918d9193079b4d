//! The wire format: what crosses between ranks, as byte messages.
//!
//! **A hand-off** travels as two MPI messages: a small fixed [`Header`] (little-endian 64-bit
//! words: a magic word, the receiving device, kind, chunk, micro-batch, dtype code, rank and
//! dimensions), then the tensor's bytes as they lie in memory. The sender's MPI send reads the
//! bytes straight from the tensor's own storage ([`Payload`]); the receiver allocates the
//! header's dtype and size ([`Landing`]), MPI writes into it, and that vector becomes the
//! received tensor (`Tensor::from_vec` takes ownership). So no copy is made in user space on
//! either side: the one copy left is MPI's between the processes (a single copy on one host,
//! with Open MPI's shared memory and CMA). The header is checked before the data is received:
//! an unknown dtype or kind, a malformed shape, or data whose byte count differs from what the
//! header announces is a [`WireError`] naming the problem, never a panic.
//!
//! Why two messages rather than one: one message would need the header and the data in one
//! buffer, i.e. a copy of the data on the sender and another (to drop the header) on the
//! receiver. The pair stays matched without any bookkeeping on the wire: MPI does not let
//! messages between two ranks on one communicator overtake each other, headers and data go on
//! communicators of their own, and the receiver takes each source's data in the order of its
//! headers (`comm.rs`).
//!
//! **One replica's gradients of one stage** (data parallelism's reduction) are a safetensors
//! buffer with the tensors named by position and (stage, replica, count) in its metadata:
//! once per step and stage, so the container's copies matter less than a hand-off's.

use std::collections::HashMap;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor, WithDType};
use zerocopy::IntoBytes;

use super::ReplicaGrads;
use crate::pipeline::handoff::HandOff;
use crate::pipeline::protocol::Msg;
use crate::pipeline::transport::{Route, RouteKind};

/// First word of every hand-off header: catches a message that is not one (another brigade
/// version's format, a stray message), "brigad" and the format's version.
const MAGIC: u64 = 0x6272_6967_6164_0002;
/// Words before the dimensions: magic, device, kind, chunk, micro-batch, dtype, rank.
const FIXED_WORDS: usize = 7;
/// More dimensions than any hand-off has: a larger rank is a corrupt header.
const MAX_RANK: usize = 16;

/// Why a hand-off could not be put on the wire or taken off it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum WireError {
    #[error("a hand-off header of {0} bytes is not {FIXED_WORDS} or more whole 8-byte words")]
    HeaderLength(usize),
    #[error("not a hand-off header: first word {0:#x}, expected {MAGIC:#x} (a different brigade version, or a stray message)")]
    Magic(u64),
    #[error("unknown hand-off kind {0} (0 is an activation, 1 a gradient)")]
    Kind(u64),
    #[error("unknown dtype code {0} in a hand-off header")]
    DtypeCode(u64),
    #[error("a hand-off header of rank {rank} has {words} words, not {expected}")]
    Rank { rank: u64, words: usize, expected: u64 },
    #[error("a hand-off of dtype {0:?} cannot travel between ranks (only whole-byte element types can)")]
    Dtype(DType),
    #[error("a hand-off of shape {0:?} is too large to address")]
    Overflow(Vec<usize>),
    #[error("the hand-off's data is {got} bytes, but its header announces {expected} ({dtype:?} of shape {shape:?})")]
    PayloadSize { got: usize, expected: usize, dtype: DType, shape: Vec<usize> },
    #[error("{0}")]
    Tensor(String),
}

impl From<candle_core::Error> for WireError {
    fn from(e: candle_core::Error) -> Self {
        WireError::Tensor(e.to_string())
    }
}

/// Defines, from one list of (dtype, code on the wire), the table of codes and the three ways
/// to reach a CPU storage of those dtypes as bytes: read, allocate, write, and own as a tensor.
macro_rules! wire_dtypes {
    ($($variant:ident = $code:literal),* $(,)?) => {
        /// The dtypes a hand-off can carry (every candle dtype with a whole-byte element type).
        const DTYPE_CODES: &[(DType, u64)] = &[$((DType::$variant, $code)),*];

        /// The storage's elements as bytes, in place.
        fn storage_bytes(storage: &CpuStorage) -> Result<&[u8], WireError> {
            match storage {
                $(CpuStorage::$variant(data) => Ok(data.as_bytes()),)*
                other => Err(WireError::Dtype(other.dtype())),
            }
        }

        /// A zeroed storage of `elements` elements of `dtype`.
        fn zeroed(dtype: DType, elements: usize) -> Result<CpuStorage, WireError> {
            match dtype {
                $(DType::$variant => Ok(CpuStorage::$variant(vec![WithDType::from_f64(0.0); elements])),)*
                other => Err(WireError::Dtype(other)),
            }
        }

        /// The storage's elements as writable bytes (every bit pattern is a valid element of
        /// these types); empty for a dtype [`zeroed`] never makes.
        fn storage_bytes_mut(storage: &mut CpuStorage) -> &mut [u8] {
            match storage {
                $(CpuStorage::$variant(data) => data.as_mut_bytes(),)*
                _ => &mut [],
            }
        }

        /// The storage as a tensor of `shape`, without copying its vector.
        fn into_tensor(storage: CpuStorage, shape: &[usize]) -> Result<Tensor, WireError> {
            match storage {
                $(CpuStorage::$variant(data) => Ok(Tensor::from_vec(data, shape, &Device::Cpu)?),)*
                other => Err(WireError::Dtype(other.dtype())),
            }
        }
    };
}

wire_dtypes!(U8 = 0, U32 = 1, I64 = 2, F16 = 3, BF16 = 4, F32 = 5, F64 = 6, I16 = 7, I32 = 8);

/// What a hand-off's first message says: where it goes, under which key, and what data follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Header {
    /// The receiving device (the stage's slot in its replica).
    pub device: usize,
    pub key: Route,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl Header {
    /// The header as little-endian words: `[magic, device, kind, chunk, microbatch, dtype, rank,
    /// dims...]`.
    pub fn to_bytes(&self) -> Result<Vec<u8>, WireError> {
        let dtype = DTYPE_CODES
            .iter()
            .find(|(d, _)| *d == self.dtype)
            .map(|(_, code)| *code)
            .ok_or(WireError::Dtype(self.dtype))?;
        let kind = match self.key.kind {
            RouteKind::Activation => 0,
            RouteKind::Gradient => 1,
        };
        let fixed = [self.device, kind, self.key.chunk, self.key.microbatch].map(|v| v as u64);
        let words = [MAGIC].into_iter().chain(fixed).chain([dtype, self.shape.len() as u64]);
        let words = words.chain(self.shape.iter().map(|&n| n as u64));
        Ok(words.flat_map(u64::to_le_bytes).collect())
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        if !bytes.len().is_multiple_of(8) || bytes.len() < FIXED_WORDS * 8 {
            return Err(WireError::HeaderLength(bytes.len()));
        }
        let words: Vec<u64> =
            bytes.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().expect("chunks of 8"))).collect();
        if words[0] != MAGIC {
            return Err(WireError::Magic(words[0]));
        }
        let kind = match words[2] {
            0 => RouteKind::Activation,
            1 => RouteKind::Gradient,
            other => return Err(WireError::Kind(other)),
        };
        let dtype = DTYPE_CODES
            .iter()
            .find(|(_, code)| *code == words[5])
            .map(|(d, _)| *d)
            .ok_or(WireError::DtypeCode(words[5]))?;
        let rank = words[6];
        if rank > MAX_RANK as u64 || words.len() != FIXED_WORDS + rank as usize {
            let expected = (FIXED_WORDS as u64).saturating_add(rank);
            return Err(WireError::Rank { rank, words: words.len(), expected });
        }
        // Values beyond this platform's usize cannot be a real tensor's: saturate, and let the
        // size check below refuse them.
        let size = |w: u64| usize::try_from(w).unwrap_or(usize::MAX);
        let header = Self {
            device: size(words[1]),
            key: Route { kind, chunk: size(words[3]), microbatch: size(words[4]) },
            dtype,
            shape: words[FIXED_WORDS..].iter().map(|&w| size(w)).collect(),
        };
        header.payload_bytes()?;
        Ok(header)
    }

    /// Bytes of the data that follows the header.
    pub fn payload_bytes(&self) -> Result<usize, WireError> {
        self.shape
            .iter()
            .try_fold(self.dtype.size_in_bytes(), |bytes, &n| bytes.checked_mul(n))
            .filter(|&bytes| bytes <= isize::MAX as usize)
            .ok_or_else(|| WireError::Overflow(self.shape.clone()))
    }
}

/// A hand-off's tensor on the CPU, contiguous, whose bytes an MPI send reads where they lie.
pub(super) struct Payload {
    /// Keeps the storage the bytes belong to alive.
    _tensor: Tensor,
    start: *const u8,
    len: usize,
}

impl Payload {
    /// The header and payload of the hand-off of `tensor` to `device` under `key`. A tensor on
    /// the CPU that is already contiguous is not copied (one on a GPU is copied to the CPU, and
    /// a strided view is made contiguous first).
    pub fn of(device: usize, key: Route, tensor: HandOff) -> Result<(Header, Self), WireError> {
        let tensor = tensor.receive(&Device::Cpu)?.contiguous()?;
        let header = Header { device, key, dtype: tensor.dtype(), shape: tensor.dims().to_vec() };
        let (start, len) = {
            let (storage, layout) = tensor.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                return Err(WireError::Tensor("a hand-off moved to the CPU is not on the CPU".into()));
            };
            let (first, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| WireError::Tensor("a contiguous tensor has no contiguous offsets".into()))?;
            let element = tensor.dtype().size_in_bytes();
            let bytes = storage_bytes(cpu)?
                .get(first * element..end * element)
                .ok_or_else(|| WireError::Tensor("a tensor's layout reaches past its storage".into()))?;
            (bytes.as_ptr(), bytes.len())
        };
        Ok((header, Self { _tensor: tensor, start, len }))
    }

    /// The tensor's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `start..start + len` lay inside the CPU storage of `_tensor` when measured;
        // the tensor keeps that storage alive, candle never moves a storage's vector, and a
        // handed-off tensor is never written again (tensors are immutable: `handoff.rs`).
        unsafe { std::slice::from_raw_parts(self.start, self.len) }
    }
}

/// Where a hand-off's data lands: a zeroed buffer of the header's dtype and size, which MPI
/// writes into and which then becomes the received tensor as it is.
pub(super) struct Landing {
    header: Header,
    storage: CpuStorage,
}

impl Landing {
    pub fn new(header: Header) -> Result<Self, WireError> {
        let elements = header.payload_bytes()? / header.dtype.size_in_bytes();
        let storage = zeroed(header.dtype, elements)?;
        Ok(Self { header, storage })
    }

    /// Refuses data of any other size than the header announced.
    pub fn check_size(&self, got: usize) -> Result<(), WireError> {
        let expected = self.header.payload_bytes()?;
        if got != expected {
            return Err(WireError::PayloadSize {
                got,
                expected,
                dtype: self.header.dtype,
                shape: self.header.shape.clone(),
            });
        }
        Ok(())
    }

    /// The buffer MPI receives into.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        storage_bytes_mut(&mut self.storage)
    }

    /// The received hand-off: (receiving device, message for its stage).
    pub fn into_message(self) -> Result<(usize, Msg), WireError> {
        let Header { device, key, shape, .. } = self.header;
        let tensor = HandOff::send(into_tensor(self.storage, &shape)?)?;
        let (chunk, microbatch) = (key.chunk, key.microbatch);
        let msg = match key.kind {
            RouteKind::Activation => Msg::Activation { chunk, microbatch, tensor },
            RouteKind::Gradient => Msg::Gradient { chunk, microbatch, tensor },
        };
        Ok((device, msg))
    }
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

    /// Sends `tensor` through the wire format as the two ranks would: header bytes, then the
    /// payload's bytes copied into the landing buffer (MPI's part).
    fn through_the_wire(device: usize, key: Route, tensor: &Tensor) -> (usize, Route, Tensor) {
        let (header, payload) = Payload::of(device, key, HandOff::send(tensor.clone()).unwrap()).unwrap();
        let header = Header::from_bytes(&header.to_bytes().unwrap()).unwrap();
        let mut landing = Landing::new(header).unwrap();
        landing.check_size(payload.bytes().len()).unwrap();
        landing.bytes_mut().copy_from_slice(payload.bytes());
        let (device, msg) = landing.into_message().unwrap();
        let (key, got) = Mailbox::handoff_of(msg).ok().unwrap();
        (device, key, got.receive(&Device::Cpu).unwrap())
    }

    fn bits(t: &Tensor) -> Vec<u8> {
        let t = t.flatten_all().unwrap();
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else { panic!("not on the CPU") };
        let (first, end) = layout.contiguous_offsets().unwrap();
        let size = t.dtype().size_in_bytes();
        storage_bytes(cpu).unwrap()[first * size..end * size].to_vec()
    }

    #[test]
    fn a_hand_off_survives_the_wire_with_key_dtype_shape_and_bits() {
        let base = (Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((2, 3, 4)).unwrap() / 7.0).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64, DType::I64, DType::U8] {
            let tensor = base.to_dtype(dtype).unwrap();
            let (device, key, got) = through_the_wire(3, Route::gradient(5, 7), &tensor);
            assert_eq!((device, key), (3, Route::gradient(5, 7)));
            assert_eq!((got.dtype(), got.dims()), (dtype, &[2, 3, 4][..]));
            assert_eq!(bits(&got), bits(&tensor), "{dtype:?} bit for bit");
        }
        let (_, key, got) =
            through_the_wire(0, Route::activation(1, 0), &Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap());
        assert_eq!((key, got.dims()), (Route::activation(1, 0), &[0, 4][..]), "an empty tensor travels too");
    }

    #[test]
    fn a_contiguous_tensor_is_sent_from_its_own_storage_and_a_view_as_only_its_elements() {
        let whole = Tensor::arange(0f32, 48.0, &Device::Cpu).unwrap().reshape((4, 12)).unwrap();
        let (_, payload) = Payload::of(1, Route::activation(1, 0), HandOff::send(whole.clone()).unwrap()).unwrap();
        let storage = {
            let (storage, _) = whole.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else { panic!("not on the CPU") };
            storage_bytes(cpu).unwrap().as_ptr()
        };
        assert_eq!(payload.bytes().as_ptr(), storage, "no copy: the send reads the tensor's storage");
        // Rows 1..3 (a contiguous view at an offset) and a transposed (strided) view.
        for view in [whole.narrow(0, 1, 2).unwrap(), whole.t().unwrap()] {
            let (header, payload) =
                Payload::of(1, Route::activation(1, 0), HandOff::send(view.clone()).unwrap()).unwrap();
            assert_eq!(header.shape, view.dims());
            assert_eq!(payload.bytes(), bits(&view.contiguous().unwrap()), "only the view's elements, in order");
        }
    }

    #[test]
    fn a_header_that_does_not_match_is_an_error_naming_the_problem() {
        let header = Header { device: 2, key: Route::activation(3, 4), dtype: DType::F32, shape: vec![2, 5] };
        let bytes = header.to_bytes().unwrap();
        assert_eq!(Header::from_bytes(&bytes).unwrap(), header);
        let word = |i: usize, value: u64| {
            let mut b = bytes.clone();
            b[i * 8..i * 8 + 8].copy_from_slice(&value.to_le_bytes());
            Header::from_bytes(&b).unwrap_err().to_string()
        };
        assert!(word(0, 7).contains("not a hand-off header"), "{}", word(0, 7));
        assert!(word(2, 9).contains("unknown hand-off kind 9"), "{}", word(2, 9));
        assert!(word(5, 99).contains("unknown dtype code 99"), "{}", word(5, 99));
        assert!(word(6, 3).contains("rank 3 has 9 words, not 10"), "{}", word(6, 3));
        assert!(word(6, u64::MAX).contains("has 9 words"), "{}", word(6, u64::MAX));
        assert!(word(7, u64::MAX).contains("too large"), "{}", word(7, u64::MAX));
        let truncated = Header::from_bytes(&bytes[..bytes.len() - 3]).unwrap_err().to_string();
        assert!(truncated.contains("not 7 or more whole 8-byte words"), "{truncated}");
        assert!(Header::from_bytes(&bytes[..16]).is_err(), "a header cut short is an error, not a panic");
        // Data of the wrong size: refused before anything is received.
        let landing = Landing::new(header).unwrap();
        assert!(landing.check_size(40).is_ok());
        let wrong = landing.check_size(44).unwrap_err().to_string();
        assert!(wrong.contains("44 bytes") && wrong.contains("announces 40") && wrong.contains("[2, 5]"), "{wrong}");
        // A dtype without whole-byte elements cannot be sent.
        let f4 = Header { device: 0, key: Route::activation(0, 0), dtype: DType::F8E4M3, shape: vec![1] };
        assert!(f4.to_bytes().unwrap_err().to_string().contains("F8E4M3"));
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
