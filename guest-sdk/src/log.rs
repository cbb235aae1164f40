//! Leveled logging to the node. Lines are attributed to the task, rate- and
//! size-limited by the host, and never part of the result.

use crate::bindings::tidepool::job::host::{self, Level};

/// Log one line at `level`.
pub fn log(level: Level, message: &str) {
    host::log(level, message);
}
/// Log at info level.
pub fn info(message: &str) {
    log(Level::Info, message);
}
/// Log at debug level.
pub fn debug(message: &str) {
    log(Level::Debug, message);
}
/// Log at warn level.
pub fn warn(message: &str) {
    log(Level::Warn, message);
}
pub use crate::bindings::tidepool::job::host::Level as LogLevel;
