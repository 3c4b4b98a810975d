use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=faultd/v1/faultd.proto");
    tonic_prost_build::configure()
        // prost's codec, but undecodable requests are INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::ProstCodec")
        .file_descriptor_set_path(out.join("faultd_v1_descriptor.bin"))
        .compile_protos(&["faultd/v1/faultd.proto"], &["."])?;
    Ok(())
}
