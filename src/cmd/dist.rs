//! `rmem completions` and `rmem man`: shell completions and man pages generated from the same
//! clap definitions as `--help`, so the three never disagree. The Debian package runs both at
//! build time (`scripts/package.sh`).

use std::path::{Path, PathBuf};

use clap::{Args, Command, CommandFactory};

use crate::exit::{Code, Failed};

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Where to write rmem.1 and one page per subcommand (rmem-swap.1, rmem-swap-up.1, ...).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

/// Prints the completion script for `shell` on stdout.
pub fn completions(a: CompletionsArgs) -> Result<(), Failed> {
    let mut cmd = super::Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "rmem", &mut std::io::stdout());
    Ok(())
}

/// Writes the man pages into `dir`.
pub fn man(a: ManArgs) -> Result<(), Failed> {
    std::fs::create_dir_all(&a.dir)
        .map_err(|e| Failed::new(Code::Failure, format!("{}: {e}", a.dir.display())))?;
    let mut cmd = super::Cli::command();
    cmd.build();
    let n = pages(&cmd, "rmem", &a.dir)?;
    eprintln!("wrote {n} man pages to {}", a.dir.display());
    Ok(())
}

/// Writes `cmd`'s page as `name`.1 and recurses into its subcommands as `name`-`sub`.
fn pages(cmd: &Command, name: &str, dir: &Path) -> Result<usize, Failed> {
    let page = cmd
        .clone()
        .name(name.to_owned())
        .bin_name(name.replace('-', " "));
    let path = dir.join(format!("{name}.1"));
    let mut f = std::fs::File::create(&path)
        .map_err(|e| Failed::new(Code::Failure, format!("{}: {e}", path.display())))?;
    clap_mangen::Man::new(page)
        .render(&mut f)
        .map_err(|e| Failed::new(Code::Failure, format!("{}: {e}", path.display())))?;
    let mut n = 1;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        n += pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(n)
}
