//! The blocking pool (in progress).
