"""Rooms: one per workspace, transport-free."""

from rooms.manager import RoomManager
from rooms.room import Peer, PeerState, Room, RoomTuning

__all__ = ["Peer", "PeerState", "Room", "RoomTuning", "RoomManager"]
