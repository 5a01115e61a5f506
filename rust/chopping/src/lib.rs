//! QKDServer core: chopping. See DESIGN.md for where this stage sits in the data flow.
