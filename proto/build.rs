//! Generates the tonic/prost code for package `modi.v1` with protox, so no
//! system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/modi/v1/agent.proto",
        "proto/modi/v1/run.proto",
        "proto/modi/v1/admin.proto",
        // The part of etcd's API the controller's etcd store speaks.
        "proto/etcd/v3.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .btree_map(".")
        // The generated `connect` constructor would clash with the `Connect`
        // rpc; clients are built from a Channel instead.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
