"""The scenarios' judgement of acknowledged writes (recorder.wrong_node_writes), on a made-up
history of etcd's leader key, without a cluster: a write on a member etcd never named is
wrong; a write in a member's hand-over tail is not; going back to a member after writing on
another is wrong however soon it happens.

History: m3 is named until 10 s, no one until 12 s, m2 until 14 s, m3 again from 14 s (the
key given back, as Patroni 3.0.2 does after a SIGSTOP of its leader)."""

from types import SimpleNamespace

from recorder import HANDOVER_S, LeaderPoller, wrong_node_writes

PORTS = {1: "m2", 2: "m3"}


def history():
    p = LeaderPoller(stack=None)
    for i in range(200):
        t = i / 10
        who = "m3" if t < 10 else "" if t < 12 else "m2" if t < 14 else "m3"
        p.samples.append((t, t + 0.01, who))
    return p


def ack(port, at):
    return {"port": port, "server_time": at - 0.01, "acked": at}


def judged(acks, handover=HANDOVER_S):
    return [(a["member"], a["acked"])
            for a in wrong_node_writes(SimpleNamespace(acks=acks), history(), PORTS, handover)]


def test_writes_on_the_named_member_are_right():
    assert judged([ack(2, 5.0), ack(1, 13.0), ack(2, 15.0)]) == []


def test_a_member_never_named_then_is_wrong():
    assert judged([ack(1, 5.0)]) == [("m2", 5.0)]


def test_the_tail_of_a_member_that_lost_the_key_is_tolerated_only_with_a_hand_over():
    tail = [ack(1, 14.5), ack(1, 15.5)]
    assert judged(tail, handover=0.0) == [("m2", 14.5), ("m2", 15.5)]
    assert judged(tail) == []


def test_a_write_past_the_hand_over_is_wrong():
    late = 14.0 + HANDOVER_S + 0.5
    assert judged([ack(1, 14.5), ack(1, late)]) == [("m2", late)]


def test_coming_back_to_a_member_after_writing_on_another_is_wrong():
    assert judged([ack(1, 14.5), ack(2, 14.6), ack(1, 14.7)]) == [("m2", 14.7)]
