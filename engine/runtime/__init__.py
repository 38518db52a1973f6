"""The runtime every family runs on: the process group and its one group object, launch and peer health, the
shard format and the sharding plan read off the module tree, and loading a rank's model from its shard."""
