//! `lab up` builds the standard lab (2 nodes, 3 pods, 1 client) and leaves it running for
//! people to explore with `ip netns exec`; `lab down` removes every lab namespace.
use anyhow::{bail, Result};
use lb_tests::lab::{delete_all, Lab, Spec};

const PREFIX: &str = "lbl";

fn main() -> Result<()> {
    lb_tests::require_root();
    match std::env::args().nth(1).as_deref() {
        Some("up") => {
            let mut lab = Lab::build(PREFIX, &Spec { pods_per_node: vec![1, 2], clients: 1, ..Spec::default() })?;
            lab.keep(PREFIX)?;
            for node in &lab.nodes {
                println!("{} ({}): netns {}", node.name, node.addr, node.ns.name);
                for pod in &node.pods {
                    println!("  pod {} on {}: netns {}", pod.addr, pod.host_device, pod.ns.name);
                }
            }
            for c in &lab.clients {
                println!("client {}: netns {}", c.addr, c.ns.name);
            }
            println!("segment bridge: netns {}", lab.segment.name);
        }
        Some("down") => println!("removed {} namespaces", delete_all(PREFIX)?),
        _ => bail!("usage: lab up|down"),
    }
    Ok(())
}
