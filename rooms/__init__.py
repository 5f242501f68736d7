"""Rooms: one per workspace, transport-free."""

from rooms.manager import RoomManager
from rooms.room import Peer, PeerState, Room, RoomConfig

__all__ = ["Peer", "PeerState", "Room", "RoomConfig", "RoomManager"]
