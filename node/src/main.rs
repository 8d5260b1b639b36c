//! `capstan-node`: the node agent binary.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("capstan-node: not wired yet")
}
