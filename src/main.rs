fn main() {
    println!("terok-shield {}", env!("CARGO_PKG_VERSION"));
}
