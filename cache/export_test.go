package cache

// stopFlusherForTest stops background work without the final flush, as a
// crash would.
func (c *Cache) stopFlusherForTest() {
	close(c.stop)
	<-c.stopped
	c.wg.Wait()
}
