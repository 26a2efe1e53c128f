package main

import (
	"testing"
)

func TestComponentsFindsIslands(t *testing.T) {
	// 0-1-2 joined (2 only lists 1), 3-4 joined one way, 5 alone.
	adj := [][]int{{1}, {}, {1}, {4}, {}, {}}
	got := components(adj)
	if len(got) != 3 || len(got[0]) != 3 || len(got[1]) != 2 || len(got[2]) != 1 {
		t.Fatalf("components %v, want sizes 3, 2, 1", got)
	}
}

func TestStormBookIsTheSameInEveryProcess(t *testing.T) {
	a, err := newStormBook(5)
	if err != nil {
		t.Fatal(err)
	}
	b, err := newStormBook(5)
	if err != nil {
		t.Fatal(err)
	}
	for i := range a.infos {
		if a.infos[i].ID != b.infos[i].ID || a.index[a.infos[i].ID] != i {
			t.Fatalf("node %d: %s vs %s", i, a.infos[i].ID, b.infos[i].ID)
		}
	}
	if a.infos[0].ID == a.infos[1].ID {
		t.Fatal("two nodes share an identity")
	}
}
