//! Raft replication of the state machine (raft-rs): the in-memory log raft
//! reads (`log`), the pure node around the state machine (`core`), the log on
//! disk (`disk`), the history each replica stores as it applies (`history`),
//! the usage windows read from it (`windows`), the state readers see
//! (`view`), the messages between nodes (`transport`) and snapshots streamed
//! in pieces (`snapshot_stream`).

pub mod archive;
pub mod core;
pub mod disk;
pub mod history;
pub mod log;
pub mod snapshot_stream;
pub mod transport;
pub mod view;
pub mod windows;

/// Sends raft-rs's slog records to `tracing`.
pub struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{}", record.msg())
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{}", record.msg()),
            // raft-rs logs every election step at info: detail for operators.
            slog::Level::Info | slog::Level::Debug | slog::Level::Trace => {
                tracing::debug!(target: "raft", "{}", record.msg())
            }
        }
        Ok(())
    }
}
