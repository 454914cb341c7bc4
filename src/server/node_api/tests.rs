//! The names the node API gives and reads: node SVIDs and the server's.

use spiffe::{SpiffeId, TrustDomain};

use super::*;

fn td() -> TrustDomain {
    TrustDomain::new("fleet.test").unwrap()
}

#[test]
fn a_node_svid_names_its_node_and_nothing_else_does() {
    let name = NodeName::new("node-a.rack1").unwrap();
    let id = node_spiffe_id(&td(), &name).unwrap();
    assert_eq!(
        id.to_string(),
        "spiffe://fleet.test/tether/node/node-a.rack1"
    );
    assert_eq!(node_name_of(&td(), &id), Some(name));
    for other in [
        "spiffe://fleet.test/tether/server",
        "spiffe://fleet.test/tether/node/",
        "spiffe://fleet.test/tether/node/a/b",
        "spiffe://fleet.test/tether/node/Node_A",
        "spiffe://fleet.test/web",
        "spiffe://other.test/tether/node/node-a",
    ] {
        let id =
            SpiffeId::new(other).unwrap_or_else(|_| SpiffeId::new("spiffe://x.test/y").unwrap());
        assert_eq!(node_name_of(&td(), &id), None, "{other}");
    }
    assert_eq!(
        server_spiffe_id(&td()).unwrap().to_string(),
        "spiffe://fleet.test/tether/server"
    );
}

#[test]
fn times_are_milliseconds_since_the_epoch() {
    assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(1500)), 1500);
    assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
}
