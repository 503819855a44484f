//! `pbxmail check-config`: validates the INI file; every problem is printed
//! as FILE:LINE: message, warnings too; exit 78 on any error.

use super::{Exit, Invocation};

pub fn run(args: &[String]) -> Exit {
    Invocation::run("check-config", args, check)
}

fn check(cmd: &Invocation) -> Result<Exit, Exit> {
    cmd.no_arguments()?;
    let config = cmd.config()?;
    for warning in &config.warnings {
        eprintln!("{warning} (warning)");
    }
    println!(
        "{}: ok, {} tenants",
        cmd.config_path().display(),
        config.tenants.len()
    );
    Ok(Exit::Ok)
}
