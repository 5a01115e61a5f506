//! QKDServer core: reconcile. See DESIGN.md for where this stage sits in the data flow.
