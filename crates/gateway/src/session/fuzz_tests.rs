//! The session driven with arbitrary input, no socket: whatever packets a
//! client sends — malformed, out of order, binary where text is due — the
//! session answers, refuses or ends the connection with a reason; it never
//! panics, and what it queues for one packet stays small.

use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::json;

use super::tests::{app, token};
use super::{Handshake, Session};
use crate::outbound::Outbound;

/// One client input: a text packet or a binary frame.
#[derive(Debug, Clone)]
enum Input {
    Text(String),
    Binary(Vec<u8>),
}

fn input() -> impl Strategy<Value = Input> {
    let events = prop_oneof![
        Just("flow:join"),
        Just("flow:leave"),
        Just("pod:move"),
        Just("pod:lock"),
        Just("auth:refresh"),
        Just("cursor:move"),
        Just("nope"),
    ];
    prop_oneof![
        // Arbitrary text.
        "\\PC{0,64}".prop_map(Input::Text),
        // Structured-looking Socket.IO packets with arbitrary parts.
        (
            0u8..8,
            prop::option::of("/[a-z]{0,6}"),
            prop::option::of(0u64..99),
            events,
            "\\PC{0,24}"
        )
            .prop_map(|(t, nsp, id, ev, data)| {
                let nsp = nsp.map(|n| format!("{n},")).unwrap_or_default();
                let id = id.map(|i| i.to_string()).unwrap_or_default();
                Input::Text(format!("{t}{nsp}{id}[\"{ev}\",{data}]"))
            }),
        Just(Input::Text(format!(
            "0/flows,{}",
            json!({"token": token("fz", 60)})
        ))),
        Just(Input::Text(
            r#"2/flows,1["flow:join",{"flowId":"f"}]"#.into()
        )),
        Just(Input::Text(
            r#"51-/flows,["pod:update",{"podId":"p","updates":{"_placeholder":true,"num":0}}]"#
                .into()
        )),
        prop::collection::vec(any::<u8>(), 0..32).prop_map(Input::Binary),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_input_never_panics_and_answers_are_bounded(inputs in prop::collection::vec(input(), 1..24)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let app = app(&[]).await;
            let (out, _rx) = Outbound::new(64, 1 << 20, Duration::from_secs(5), app.metrics.clone());
            let mut s = Session::new(app.clone(), Handshake::default(), out);
            for i in inputs {
                let (r, len) = match &i {
                    Input::Text(t) => (s.on_message(t).await, t.len()),
                    Input::Binary(b) => (s.on_binary(Bytes::from(b.clone())).await, b.len()),
                };
                let mut answered = 0;
                while let Some(f) = s.pop_local() {
                    answered += f.bytes();
                }
                // An answer is a few small frames, whatever was sent (a
                // join answers with the flow's members: one here).
                prop_assert!(answered <= 2_048 + len.min(64), "{answered} bytes for {i:?}");
                if r.is_err() {
                    break;
                }
            }
            s.close(&crate::engineio::End::ClientClosed).await;
            Ok(())
        })?;
    }
}
