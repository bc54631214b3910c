//! `heist-sandbox`: the helper the worker starts for every sandboxed command. All of its logic
//! lives in [`heist_worker::sandbox::helper`]; see there.

fn main() -> std::process::ExitCode {
    heist_worker::sandbox::helper::main()
}
