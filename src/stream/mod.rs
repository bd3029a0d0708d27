//! Streaming: the pgoutput decoder, the replication session and the apply path.

pub mod decoder;
