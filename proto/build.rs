//! Compiles `heist/v1/*.proto` with protox (pure Rust, no system `protoc`) and generates the
//! prost messages and tonic clients/servers. The encoded descriptor set is written next to the
//! generated code for gRPC server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

const PROTOS: &[&str] = &[
    "heist/v1/agent.proto",
    "heist/v1/audit.proto",
    "heist/v1/auth.proto",
    "heist/v1/checkpoint.proto",
    "heist/v1/client.proto",
    "heist/v1/cluster.proto",
    "heist/v1/heist.proto",
    "heist/v1/session.proto",
    "heist/v1/tool.proto",
    "heist/v1/worker.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["."])?;
    fs::write(out_dir.join("heist_descriptor.bin"), fds.encode_to_vec())?;
    // Every RPC's path (`/package.Service/Method`), sorted: the bounded set of method labels.
    let mut methods: Vec<String> =
        fds.file
            .iter()
            .flat_map(|file| {
                let package = file.package().to_owned();
                file.service.iter().flat_map(move |service| {
                    let package = package.clone();
                    service.method.iter().map(move |method| {
                        format!("/{package}.{}/{}", service.name(), method.name())
                    })
                })
            })
            .collect();
    methods.sort();
    fs::write(out_dir.join("heist_methods.rs"), format!("&{methods:?}"))?;
    tonic_prost_build::configure()
        // Blob bytes are decoded as views of the received buffer, not copied out of it.
        .bytes(".heist.v1.BlobChunk.data")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
