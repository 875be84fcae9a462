//! vdsa
