"""QMP waits block on QEMU's events, not on a timer (issue 12): a Watch on a Client wakes at
the MIGRATION event of a state change, and at once when QEMU dies, long before its timeout;
on a monitor that passes no events (libvirt's) it falls back to polling."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
from qemu.qmp import Runstate

from testbed.guests import BootGuest
from testbed.qemu import Vm
from vmsnap.orchestration import qmp as qmpmod
from vmsnap.orchestration.modes import clean_capabilities


@pytest.mark.qemu
def test_watch_wakes_on_events_and_on_qemu_death(workdir, monkeypatch):
    """Its safety net (EVENT_WAIT_MAX) is raised to 60 s once the migration is done: only
    QEMU's death can end the last wait early, and the bound on it can be generous (one under
    the 1 s net was at the mercy of the host's load)."""
    guest = BootGuest(memory_mb=64)
    with Vm(guest.config("7.2", workdir), workdir, "src") as vm:

        async def scenario() -> tuple[list[str | None], float]:
            client, _ = await qmpmod.connect(str(vm.tool_qmp_path))
            try:
                await qmpmod.set_capabilities(client, clean_capabilities())
                woke: list[str | None] = []
                async with qmpmod.watch(client) as changes:
                    await client.execute("migrate", {"uri": "exec:cat > /dev/null"})
                    while True:  # the first events may come before the first question
                        woke.append(await changes.wait(60))
                        if (await qmpmod.migration_status(client))["status"] == "completed":
                            break
                    monkeypatch.setattr(qmpmod, "EVENT_WAIT_MAX", 60.0)
                    vm.kill()
                    t0 = time.monotonic()
                    while await changes.wait(60) is not None:  # events left from the end
                        pass
                    return woke, time.monotonic() - t0
            finally:
                await qmpmod.disconnect(client)

        woke, gone = asyncio.run(scenario())
    assert woke and all(w in qmpmod.MIGRATION_EVENTS for w in woke), woke  # never a timeout
    assert gone < 30, gone  # QEMU's death woke it, not the 60 s timeout and net


def test_watch_polls_a_monitor_without_events(monkeypatch):
    """Without events a Watch polls: every FIRST_POLL at first, then twice as long each
    time up to its `poll`. The sleeps it asks for are checked (a loaded host may oversleep
    a short one by any amount: a bound of 30 ms on the first was at its mercy), and that
    it does sleep the last."""
    class NoEvents:  # libvirt's DomainMonitor passes commands, not events
        async def execute(self, cmd, arguments=None, *, timeout=None):
            return {}

    asked: list[float] = []
    sleep = asyncio.sleep

    async def noted_sleep(delay, *args):
        asked.append(delay)
        return await sleep(delay, *args)

    monkeypatch.setattr(qmpmod.asyncio, "sleep", noted_sleep)

    async def scenario() -> list[float]:
        took = []
        async with qmpmod.watch(NoEvents(), poll=0.05) as changes:
            for _ in range(8):
                t0 = time.monotonic()
                assert await changes.wait(60) is None
                took.append(time.monotonic() - t0)
        return took

    took = asyncio.run(scenario())
    assert asked == [min(qmpmod.FIRST_POLL * 2 ** i, 0.05) for i in range(8)], asked
    assert asked[0] < 0.01 and 0.045 < took[-1], (asked, took)


def test_watch_takes_the_outcome_of_what_it_cancels():
    """A wait that times out cancels its two tasks and takes whatever they end with: a task
    cut short may end with an error of its own instead of CancelledError (as a QMP query
    cut short by QEMU's death ends with QemuGoneError), and asyncio must never print "Task
    exception was never retrieved" after vmsnap's one-line error."""
    class Listener:  # a get() that, cut short, fails
        async def get(self):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise qmpmod.QemuGoneError("monitor closed") from None

        def clear(self):
            pass

    class Connected:  # a monitor that stays connected
        name = "stub"
        runstate = Runstate.RUNNING

        async def runstate_changed(self):
            await asyncio.Event().wait()

    reported: list[str] = []

    async def scenario() -> str | None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
        woke = await qmpmod.Watch(Connected(), Listener(), poll=0.05).wait(0.01)
        for _ in range(5):  # the cancelled tasks end
            await asyncio.sleep(0)
        gc.collect()  # an unretrieved exception is reported when its task is collected
        return woke

    assert asyncio.run(scenario()) is None
    assert not reported, reported
