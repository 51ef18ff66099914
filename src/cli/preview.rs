pub fn run(_args: &super::PreviewArgs, _ctx: &super::Context) -> anyhow::Result<()> { anyhow::bail!("preview: not implemented yet") }
