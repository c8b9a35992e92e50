//! vsock packet constants (virtio 1.2 §5.10.6). Parsing and building packets in guest memory is
//! done by the `virtio-vsock` crate's `VsockPacket`.

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// The only socket type cinder supports.
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset.
pub const OP_RST: u16 = 3;
/// Orderly shutdown (flags say which directions).
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// "Here is my buffer state."
pub const OP_CREDIT_UPDATE: u16 = 6;
/// "Tell me your buffer state."
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
