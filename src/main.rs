//! Thin launcher: all logic lives in the library so that tests reuse it.

fn main() -> std::process::ExitCode {
    order_service::cli::main()
}
