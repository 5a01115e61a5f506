//! QKDServer core: sync. See DESIGN.md for where this stage sits in the data flow.
