//! The codec of the generated services: prost's, except that a message that does not decode
//! (a string field that is not UTF-8, a truncated field, a wrong wire type) is the caller's
//! INVALID_ARGUMENT, naming the field prost stopped at, and not INTERNAL: nothing went wrong
//! inside the receiver.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// `tonic_prost::ProstCodec` with `Decoder` below.
#[derive(Debug, Clone)]
pub struct ProstCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for ProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder { _type: PhantomData }
    }
}

/// Decodes `U`; a decode error is INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct ProstDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for ProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(decode_error)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// prost names the message and field it stopped at, e.g. `failed to decode Protobuf message:
/// Fault.labels: invalid string value: data is not UTF-8 encoded`.
fn decode_error(error: prost::DecodeError) -> Status {
    Status::invalid_argument(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undecodable_strings_are_invalid_arguments() {
        // Field 1 (a string in both messages below), length 2, bytes that are not UTF-8.
        let bytes: &[u8] = &[0x0a, 0x02, 0xc3, 0x28];
        let error = crate::v1::RemoveRequest::decode(bytes).expect_err("not UTF-8");
        let status = decode_error(error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("RemoveRequest.id"), "{status:?}");
        assert!(status.message().contains("UTF-8"), "{status:?}");
    }
}
