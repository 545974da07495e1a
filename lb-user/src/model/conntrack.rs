//! Which UDP flows to forget after a change, as kube-proxy's conntrack cleanup decides
//! (pkg/proxy/conntrack/cleanup.go over the endpoint changes pkg/proxy/endpoints.go
//! detects). A UDP flow has no end the datapath could see, so a client that keeps sending
//! would stay pinned to a backend that is gone, or to the refusal it met before the
//! Service had endpoints. TCP needs none of this: its flows end or reset.
use std::{collections::BTreeSet, net::SocketAddrV4};

use super::{Desired, FrontendKey, Protocol};

/// A set of UDP flows for the datapath to remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FlowCleanup {
    /// Flows from a client through `frontend` to `backend`: the endpoint no longer serves
    /// it (deleted, or no longer serving), so the next datagram must choose again.
    ToBackend { frontend: FrontendKey, backend: SocketAddrV4 },
    /// Every flow to `frontend`: it had no serving endpoint and now has some (clients that
    /// were refused must not stay stuck on that), or it is gone.
    ToFrontend { frontend: FrontendKey },
}

/// The UDP flows to remove when the datapath goes from `old` to `new`, in a fixed order.
/// Only endpoints leaving the serving set count: a change of traffic policy or topology
/// moves no existing flow, just as it moves no TCP connection.
///
/// `old` must be what the datapath serves now: compared with an empty state (say, after a
/// restart that adopted the maps) every frontend with endpoints looks newly active and all
/// its flows would be cleared.
pub fn flow_cleanups(old: &Desired, new: &Desired) -> Vec<FlowCleanup> {
    let mut out = BTreeSet::new();
    let udp = |k: &&FrontendKey| k.protocol == Protocol::Udp;
    for (key, before) in old.frontends.iter().filter(|(k, _)| udp(k)) {
        let Some(after) = new.frontends.get(key) else {
            // kube-proxy clears the ClusterIPs of deleted UDP Services; here every frontend
            // that is gone, since its flows would otherwise still be translated.
            out.insert(FlowCleanup::ToFrontend { frontend: *key });
            continue;
        };
        for backend in before.serving.iter().filter(|b| !after.serving.contains(b)) {
            out.insert(FlowCleanup::ToBackend { frontend: *key, backend: *backend });
        }
    }
    for (key, after) in new.frontends.iter().filter(|(k, _)| udp(k)) {
        let served_before = old.frontends.get(key).is_some_and(|f| !f.serving.is_empty());
        if !after.serving.is_empty() && !served_before {
            out.insert(FlowCleanup::ToFrontend { frontend: *key });
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests;
