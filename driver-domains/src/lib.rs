//! Driver domains: each binary drives one kind of device that the manifest
//! assigns to it, in ring 3, confined by the IOMMU. Logic that needs no
//! device lives in modules here and is tested on the host.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod blk;
pub mod blk_pattern;
pub mod device;
pub mod net;
pub mod netframe;
pub mod netserve;
pub mod nettcp;
pub mod nic;
pub mod serve;
pub mod stream_pattern;
pub mod tcp_stream;
pub mod vblk;
