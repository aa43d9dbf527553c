//! Checkers: what must hold at every step of a scenario ([`safety`]) and at its end, after
//! the heal ([`liveness`]), judged against the workload's acknowledged history
//! ([`crate::model::Model`]) and the world's state; the nodes' data path ([`data_path`]:
//! connects and mounts only of held volumes, no outage reaching a default volume, staged
//! volumes usable again within a bound after the heal). The no-overlap checker judges
//! online, as port calls happen, so it sits below the world ([`crate::overlap`]).

pub mod data_path;
pub mod events;
pub mod liveness;
pub mod safety;
