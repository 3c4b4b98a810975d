//! The `faultd.v1` API, generated from `faultd/v1/faultd.proto`.

pub mod codec;

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("faultd.v1");

    /// Encoded `FileDescriptorSet` of the API, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("faultd_v1_descriptor");
}
