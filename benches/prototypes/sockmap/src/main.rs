use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{}", sockmap_forward::USAGE);
        return ExitCode::SUCCESS;
    }
    let cfg = match sockmap_forward::parse_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sockmap-forward: {e}\n{}", sockmap_forward::USAGE);
            return ExitCode::from(2);
        }
    };
    match sockmap_forward::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sockmap-forward: {e}");
            ExitCode::FAILURE
        }
    }
}
