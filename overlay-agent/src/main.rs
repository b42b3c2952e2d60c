fn main() {
    println!("overlay-agent");
}
