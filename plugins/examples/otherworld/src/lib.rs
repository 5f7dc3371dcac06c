//! Test fixture: a well-behaved component (no forbidden imports) that implements a
//! different world (`other:thing/greeter`, see `wit/world.wit`) instead of
//! `beacon:plugin/processor`. Beacon must refuse it for not implementing the contract.

wit_bindgen::generate!({ path: "wit", world: "greeter" });

struct Greeter;

impl Guest for Greeter {
    fn greet(name: String) -> String {
        format!("hello, {name}")
    }
}

export!(Greeter);
