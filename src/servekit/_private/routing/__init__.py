"""In every process that sends requests: the router, one RoutedRequest per request, the replica
sets it picks from, and the long poll that keeps them current."""
