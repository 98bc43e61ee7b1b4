"""Probe: can amqtt (pure-Python broker) stand in for Mosquitto in standalone mode?

Needs `pip install amqtt` (not a project dependency). Checks MQTT 5 support
and whether a QoS 1 message published while a persistent-session subscriber
is away reaches it when it returns. Result on 2026-11-25 with amqtt 0.12.1:
MQTT 5 refused ("Unsupported protocol version"), and the 3.1.1 persistent
session did not deliver the message: standalone requires Mosquitto.
"""
import asyncio, threading, time, sys

from amqtt.broker import Broker
port = 18830
config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}}, "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
def run():
    loop = asyncio.new_event_loop(); asyncio.set_event_loop(loop)
    b = Broker(config, loop=loop); loop.run_until_complete(b.start()); loop.run_forever()
threading.Thread(target=run, daemon=True).start(); time.sleep(2)
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
res = {}
def try_connect(proto):
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"t{proto}", protocol=proto)
    ev = threading.Event()
    c.on_connect = lambda *a: (res.__setitem__(proto, str(a[3])), ev.set())
    try:
        c.connect("127.0.0.1", port); c.loop_start(); ok = ev.wait(5); c.loop_stop()
        return res.get(proto, "no CONNACK in 5 s")
    except Exception as e:
        return repr(e)
print("MQTT 5:", try_connect(paho.MQTTv5))
print("MQTT 3.1.1:", try_connect(paho.MQTTv311))
# persistent session over 3.1.1
got = []
sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev", protocol=paho.MQTTv311, clean_session=False)
sub.on_message = lambda c,u,m: got.append(m.payload)
sub.connect("127.0.0.1", port); sub.loop_start(); time.sleep(0.5); sub.subscribe("a/b", 1); time.sleep(0.5); sub.disconnect(); sub.loop_stop()
pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="pub", protocol=paho.MQTTv311)
pub.connect("127.0.0.1", port); pub.loop_start(); pub.publish("a/b", b"while-away", qos=1).wait_for_publish(5); time.sleep(0.5)
sub2 = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev", protocol=paho.MQTTv311, clean_session=False)
sub2.on_message = lambda c,u,m: got.append(m.payload)
sub2.connect("127.0.0.1", port); sub2.loop_start(); time.sleep(2)
print("3.1.1 persistent session delivered while-away:", got)
