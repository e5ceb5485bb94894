//! `elbo config …`.

use clap::Subcommand;

use super::layers::ConfigArgs;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the resolved configuration as TOML.
    Show(ConfigArgs),
    /// List every config key.
    Keys,
}

pub fn run(cmd: ConfigCommand) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Show(args) => print!("{}", args.load()?.to_toml()),
        ConfigCommand::Keys => {
            for key in elbo_settings::known_keys() {
                println!("{key}");
            }
        }
    }
    Ok(())
}
