"""The security suite: one file per attack class (PROTOCOL.md is the contract).

==========================  ==========================================================
test_replay.py              inits, messages and chunks sent again (node and our client)
test_forgery.py             init signatures that are not the client's own low-S one
test_tampering.py           every byte of an init and a message flipped
test_mitm.py                ephemeral key swapped on the path, signature kept
test_isolation.py           sessions of other connections; concurrent streams' keys
test_nonces.py              100,000 chunk nonces; distinct keys per session
test_constant_time.py       no ``==`` on secrets, MACs, keys or addresses in node/
test_secrets_in_output.py   keys and plaintext absent from logs, metrics, errors
test_key_wipe.py            key buffers zeroed however a connection or session ends
test_resource_limits.py     frame size, error budget, silent clients, connections, inits
test_crash_resistance.py    nothing a client sends takes the node process down
test_frame_fuzz.py          Hypothesis frame fuzzer through a whole node
test_faults.py              disconnect, backend crash, SIGTERM, slow reader, upstream down
==========================  ==========================================================

``scripts/fuzz_node.py`` (100,000 frames against a node process) and
``scripts/loadtest.py`` (1,000 sessions x 5 prompts) are the long-running versions.
"""
