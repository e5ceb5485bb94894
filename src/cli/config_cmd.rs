//! `elbo config …`.

use clap::Subcommand;
use elbo_engine::Engine;

use super::args::ConfigArgs;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the resolved configuration as TOML.
    Show(ConfigArgs),
    /// List every config key (every model kind's section included).
    Keys,
    /// List the model kinds `model.kind` may select.
    Models,
}

pub fn run(engine: &Engine, cmd: ConfigCommand) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Show(args) => print!("{}", args.load(engine)?.to_toml()),
        ConfigCommand::Keys => {
            for key in elbo_settings::known_keys(&engine.registry) {
                println!("{key}");
            }
        }
        ConfigCommand::Models => {
            for kind in engine.registry.kinds() {
                let about = engine.registry.about(kind).unwrap_or_default();
                println!("{kind:<12} {about}");
            }
        }
    }
    Ok(())
}
