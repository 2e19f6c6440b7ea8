/* The broker's public plugin API, from Debian's mosquitto-dev / libmosquitto-dev.
 * build.rs runs bindgen over this file; nothing from Mosquitto's source is copied here. */
#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>
