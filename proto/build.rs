// Protos are compiled with protox (pure Rust), so a fresh machine needs no `protoc`.
use std::path::PathBuf;

use prost::Message;
use prost_types::method_options::IdempotencyLevel;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["coop/v1/coop.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // `compile_fds` does not write the descriptor set itself; reflection needs it.
    std::fs::write(out.join("coop_descriptor.bin"), fds.encode_to_vec())?;
    // The methods a client may send again after a timeout: the proto says so
    // with the standard `idempotency_level` option, next to each method.
    let mut safe = Vec::new();
    for file in &fds.file {
        for service in &file.service {
            for method in &service.method {
                let level = method
                    .options
                    .as_ref()
                    .map_or(IdempotencyLevel::IdempotencyUnknown, |o| {
                        o.idempotency_level()
                    });
                if level != IdempotencyLevel::IdempotencyUnknown {
                    safe.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    std::fs::write(
        out.join("retry_safe.rs"),
        format!("pub const RETRY_SAFE: &[&str] = &{safe:?};\n"),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
