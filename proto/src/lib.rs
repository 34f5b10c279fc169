//! The coop.v1 gRPC API, generated at build time from `proto/coop/v1/*.proto`.

pub mod v1 {
    tonic::include_proto!("coop.v1");

    /// Encoded descriptors, served by gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("coop_descriptor");

    /// Paths (`/coop.v1.Service/Method`) of the methods the proto marks
    /// `idempotency_level`: safe to send again after a timeout.
    pub mod retry {
        include!(concat!(env!("OUT_DIR"), "/retry_safe.rs"));
    }
}
