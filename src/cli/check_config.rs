//! `pbxmail check-config`: validates the INI file; every problem is printed
//! as FILE:LINE: message, warnings too; exit 78 on any error.

use super::{load_config, take_config_flag, Exit};

pub fn run(args: &[String]) -> Exit {
    let (path, rest) = match take_config_flag(args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("pbxmail check-config: {e}");
            return Exit::Usage;
        }
    };
    if let Some(extra) = rest.first() {
        eprintln!("pbxmail check-config: unexpected argument '{extra}'");
        return Exit::Usage;
    }
    match load_config(&path) {
        Ok(config) => {
            for warning in &config.warnings {
                eprintln!("{warning} (warning)");
            }
            println!("{}: ok, {} tenants", path.display(), config.tenants.len());
            Exit::Ok
        }
        Err(code) => code,
    }
}
