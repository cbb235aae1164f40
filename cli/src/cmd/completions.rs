//! `tidepool completions SHELL` and `tidepool man --out DIR`: shell
//! completions and man pages generated from the CLI definition itself, so
//! they never drift from the flags.

use clap::CommandFactory;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

#[derive(clap::Args)]
pub struct ManArgs {
    /// Directory to write `tidepool.1` and one page per verb into.
    #[arg(long)]
    pub out: PathBuf,
}

/// Print the completion script for `a.shell` on stdout.
pub fn completions<C: CommandFactory>(a: CompletionsArgs) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let mut cmd = C::command();
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "tidepool", &mut script);
    match std::io::stdout().write_all(&script) {
        // A reader that stopped early (`| head`) is not an error.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Write the man pages (the command and every verb, nested ones joined
/// with `-`, as `git` does) into `a.out`.
pub fn man<C: CommandFactory>(a: ManArgs) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let cmd = C::command();
    let mut written = 0usize;
    write_pages(&cmd, "tidepool", &a.out, &mut written)?;
    println!("{written} man pages in {}", a.out.display());
    Ok(ExitCode::SUCCESS)
}

fn write_pages(
    cmd: &clap::Command,
    name: &str,
    dir: &std::path::Path,
    written: &mut usize,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let page = cmd.clone().bin_name(name.replace('-', " "));
    let mut out = Vec::new();
    clap_mangen::Man::new(page).title(name).render(&mut out)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
    *written += 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
